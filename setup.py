"""Installs qsmgan_tf and its data_prep pipeline.

CPU users: ``pip install -e ".[cpu]"``; GPU users: ``pip install -e ".[gpu]"``.
TensorFlow comes through these extras so each gets the right wheel; never install both.
"""

import pathlib
import re

from setuptools import find_packages, setup

_HERE = pathlib.Path(__file__).parent
_VERSION = re.search(r'__version__ = "([^"]+)"',
                     (_HERE / "qsmgan_tf" / "__init__.py").read_text()).group(1)

setup(
    name="qsmgan_tf",
    version=_VERSION,
    description="QSMGAN in TensorFlow/Keras 3: field -> susceptibility with a 3D GAN, "
                "data preparation, distributed training, TF Serving export and evaluation.",
    long_description=(_HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["qsmgan_tf", "qsmgan_tf.*", "data_prep", "data_prep.*"]),
    include_package_data=True,
    install_requires=[
        "keras>=3.15,<4",
        "numpy>=1.26",
        "scipy>=1.11",
        "nibabel>=5.2",
        "absl-py>=2.1",
        "tensorboard>=2.21,<2.22",
        # Metrics: qsm_ci.qsm_eval.score_arrays as of 0.6.2 (pinned: the numbers must stay
        # comparable with the QSM-CI leaderboard).
        "qsm-ci==0.6.2",
        # data_prep: the Beam pipeline and the ICBM152 template nilearn ships in its wheel.
        "apache-beam>=2.77,<3",
        # TFRecord CRCs: qsmgan_tf.records.framing checks them with it, and Beam's sinks pick it
        # up: 20x faster than crcmod (BUILD.md, data_prep).
        "google-crc32c>=1.5",
        "nilearn>=0.10",
        "tqdm>=4.66",
        "matplotlib>=3.8",
    ],
    extras_require={
        "cpu": ["tensorflow-cpu==2.21.*"],
        "gpu": ["tensorflow[and-cuda]==2.21.*"],
        # Test-only: qsm-forward (GPL-3.0) is an independent forward model used to check ours;
        # the package never imports it.
        "test": ["pytest>=8", "pytest-xdist>=3.5", "qsm-forward==0.32", "grpcio>=1.60"],
    },
    entry_points={
        "console_scripts": [
            "qsmgan-predict=qsmgan_tf.predict:run",
        ],
    },
    classifiers=[
        "License :: OSI Approved :: Apache Software License",
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Medical Science Apps.",
    ],
)
