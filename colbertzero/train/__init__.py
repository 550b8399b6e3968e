"""Training core: process group (`dist`), the module DeepSpeed wraps (`module`), the loss by phase kind (`losses`),
one optimizer step with or without GradCache (`gradcache`), and the DeepSpeed engine from a phase (`engine`).

Typical use by the phase runner, per rank::

    runtime = dist.init_distributed(bf16=phase.bf16)
    model = module.ColBERTForTraining(colbert, phase)
    engine, optimizer, scheduler = engine.build_engine(model, phase, total_steps, runtime=runtime)
    for batch in loader:
        result = gradcache.train_step(engine, batch, phase)   # StepResult: loss, grad_norm, temperature, lr, ...
    dist.teardown()
"""
