"""Image bytes to model input: decoding within limits and open_clip's preprocess, with Pillow on
the CPU or in tensor operations on the model's device (nvJPEG on CUDA)."""
