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

# INERRANT on the tiny run: blob's labels removed from half of the phantoms (the training split holds some of
# each), 2 epochs on the partial labels, then 2 relabelling steps
TINY_INERRANT_RUN = (
    "train.scheme=inerrant",
    "loss.name=partial_bce",
    *TINY_PHANTOM_RUN,
    "data.partial_labels={phantom_000: [sphere], phantom_002: [sphere], phantom_004: [sphere], phantom_006: [sphere]}",
    "train.epochs=4",
    "train.steps_per_epoch=3",
    "train.inerrant.initial_epochs=2",
    "train.inerrant.relabel_steps=2",
    "train.inerrant.gamma_max=0.6",
)


def phantom_cases(n: int, shape: tuple[int, ...]):
    """n prepared 3-class phantom cases named c0, c1, ... (seeds 0..n-1) on a `shape` grid of 1 mm voxels, for
    driving samplers and relabellers without a data folder."""
    from edgeseg.data.cases import PreparedCase
    from edgeseg.data.phantoms import make_phantom

    cases = []
    for seed in range(n):
        image, label = make_phantom(shape, 3, seed)
        cases.append(PreparedCase(name=f"c{seed}", image=image, label=label, spacing=(1.0,) * len(shape),
                                  original=None, original_label=None))  # type: ignore[arg-type]
    return cases
