"""The model run: runtimes (PyTorch on CPU or CUDA, ONNX Runtime), ONNX export, CUDA graphs, and
batches decoded and encoded on the device."""
