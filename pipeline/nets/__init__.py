"""The AIRT networks (paper section 5.2, Supplementary Note S1), one per module.

* :mod:`pipeline.nets.dose_proposer` - 3D ResUNet: CT + structures -> proposed dose.
* :mod:`pipeline.nets.bev2fluence` - 3D MedNeXt: BEV dose stack -> fluence maps; with two input
  channels it is the fluence correction network.
* :mod:`pipeline.nets.fast_dose` - physics stage (primary fluence as spherical harmonics) +
  MedNeXt stage: fluence maps -> dose.
* :mod:`pipeline.nets.err` - the parameter-free dose error module.
* :mod:`pipeline.nets.discriminator` - StyleGAN2-like fluence-map discriminator and hinge/R1 losses.
* :mod:`pipeline.nets.registry` - the fixed architecture registry used by :mod:`pipeline.model_io`.

Every network is built from a frozen config dataclass of plain ints, floats and tuples with
``.paper()`` (the paper's sizes) and ``.small()`` (CPU sizes) constructors.
"""
