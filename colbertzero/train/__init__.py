"""Training core, in PyLate's split: scores and losses by phase kind (`losses`), the module DeepSpeed wraps
(`module`), one optimizer step of every kind, GradCache included (`step`), the DeepSpeed engine (`engine`); the
process group and cross-rank agreement (`dist`), after the GPU check (`accelerator`); the components the loop
calls, each owning its cadence (`checkpoint.Checkpointer`, `metering.Metrics`, `evaluation.Evaluator`); export; and
the phase runner (`runner`).

Per rank::

    rt = dist.init_distributed(bf16=phase.bf16)                       # Runtime: rank, world_size, device, dtype
    model = module.ColBERTForTraining.for_phase(colbert, phase)       # PyLate ColBERT + temperature
    eng, optimizer, scheduler = engine.build_engine(model, phase, total_steps, runtime=rt)
    for batch in loader:
        res = step.train_step(eng, batch, phase)  # loss, grad_norm, temperature, lr, n_queries, n_tokens
    dist.teardown()

Nothing here imports the launcher: the runner's exit code (`runtime.Exit`) and the manifest are all they share.
"""
