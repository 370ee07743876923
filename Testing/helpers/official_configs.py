"""Official checkpoint configs, field for field, for tests that need the full-size shapes without the weights."""

# What the official M3DCLIPConfig.save_pretrained writes (fields + transformers bookkeeping), at full size.
OFFICIAL_CONFIG_JSON = {
    "_name_or_path": "./LaMed/output/CLIP",
    "architectures": ["M3DCLIP"],
    "auto_map": {"AutoConfig": "configuration.M3DCLIPConfig", "AutoModel": "modeling.M3DCLIP"},
    "dropout_rate": 0,
    "gather_loss": True,
    "hidden_size": 768,
    "img_size": [32, 256, 256],
    "in_channels": 1,
    "language_model_name_or_path": "./LaMed/pretrained_model/bert_base_uncased/",
    "local_loss": False,
    "max_text_len": 128,
    "mlp_dim": 3072,
    "model_type": "m3d_clip",
    "num_heads": 12,
    "num_layers": 12,
    "patch_size": [4, 16, 16],
    "pos_embed": "perceptron",
    "spatial_dims": 3,
    "torch_dtype": "float32",
    "transformers_version": "4.40.1",
    "vocab_size": 30522,
}
