"""Model code for one device, tensors in and out: VLM, All-in-one, LAVENDER, E-ViLM, the VQ
tokenizer, S3D-G, EfficientNet-Lite and the worked example; their weight and tokenizer loaders."""
