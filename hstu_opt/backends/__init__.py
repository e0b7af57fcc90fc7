"""Engine backends, one module each: eager (the reference), onnxruntime, tensorrt, aoti (AOTInductor
packages), compiled (torch.compile with shipped Inductor cache artifacts, the GPU engine): build /
load / run / describe. Every runner takes the same padded feed (backends.eager.input_names).

Each backend module imports its framework lazily; asking for a missing one raises
BackendUnavailable naming the pip extra.
"""
