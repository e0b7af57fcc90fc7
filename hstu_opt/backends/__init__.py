"""Engine backends, one module each (eager, onnxruntime, tensorrt): build / load / run / describe.

Each backend module imports its framework lazily; asking for a missing one raises
BackendUnavailable naming the pip extra.
"""
