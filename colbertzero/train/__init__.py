"""Training core: process group (`dist`), the module DeepSpeed wraps (`module`), the loss by phase kind (`losses`),
one optimizer step with or without GradCache (`gradcache`), the DeepSpeed engine from a phase (`engine`); the phase
runner (`runner`), checkpoints and export build on them.

Per rank::

    rt = dist.init_distributed(bf16=phase.bf16)                       # Runtime: rank, world_size, device, dtype
    model = module.ColBERTForTraining.for_phase(colbert, phase)       # PyLate ColBERT + temperature
    eng, optimizer, scheduler = engine.build_engine(model, phase, total_steps, runtime=rt)
    for batch in loader:
        res = gradcache.train_step(eng, batch, phase)  # loss, grad_norm, temperature, lr, n_queries, n_tokens
    dist.teardown()
"""
