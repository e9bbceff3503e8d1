"""Anatomical priors (torch-free, numpy/scipy): STIPPLE's 3D spatial prior (Petit et al., abdominal-organ
thesis; see ../shared/methods.md): `stipple` builds, stores and paints the prior, `placement` places it on an
unlabelled volume by a KL-minimising translation, `activation` combines it with the network's logits."""
