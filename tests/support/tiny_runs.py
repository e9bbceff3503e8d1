"""The override list of a tiny phantom training run (seconds on one CPU thread), shared by the tests of the
training schemes. On `pythonpath` (pyproject.toml) because pytest's importlib mode lets no test module import
another."""

TINY_PHANTOM_RUN = (
    "data.root=synthetic",
    "data.class_names=[background, sphere, blob]",
    "data.synthetic_cases=8",
    "data.synthetic_shape=[24, 24, 24]",
    "data.patch_size=[8, 8, 8]",
    "data.inference_tile=[24, 24, 24]",
    "model.depth=1",  # depth 2 on 8^3 patches (a 2^3 bottleneck) trains non-deterministically on torch's CPU kernels
    "model.base_width=4",
    "train.batch_size=2",
    "train.num_threads=1",
    "train.deterministic=true",
)
