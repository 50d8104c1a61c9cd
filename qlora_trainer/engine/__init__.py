"""The engine: `build(run)` turns a resolved run into a model ready to train (quantized base, adapter, checkpointing,
fused / chunked / compiled paths, optimizer), and `train_step` takes one step. Used by `train`, `bench` and the
peer comparison alike."""
