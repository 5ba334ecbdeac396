"""qsmgan_tf: quantitative susceptibility mapping with a 3D GAN in TensorFlow/Keras 3.

Modules follow the pipeline: ``physics`` -> ``classical`` -> ``data`` -> ``networks`` ->
``gan``/``train`` -> ``export`` -> ``inference``/``predict`` -> ``metrics``/``evaluate``.
Importing the package does no work and does not import TensorFlow.
"""

__version__ = "0.1.0"
