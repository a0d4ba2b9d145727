"""dsl-tf: Dynamic Sparse Learning for TensorFlow / Keras recommendation models."""

from setuptools import find_packages, setup

setup(
    name="dsl-tf",
    version="0.1.0",
    description=(
        "Train recommendation models sparse from scratch at a fixed parameter budget "
        "(Dynamic Sparse Learning, WSDM'24) and ship them as compact TF Serving models."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10,<3.13",
    packages=find_packages(include=["dsl_tf", "dsl_tf.*", "trainers", "trainers.*", "export", "export.*"]),
    install_requires=[
        "tensorflow>=2.21,<2.22",
        "tf-keras>=2.21,<2.22",
        "tensorboard>=2.20,<2.22",
        "tensorflow-recommenders>=0.7.7,<0.8",
        "tensorflow-model-optimization>=0.8.1,<0.9",
        "tensorflow-serving-api>=2.21,<2.22",
        "numpy>=1.26,<3",
        "scipy>=1.11,<2",
    ],
    extras_require={
        "test": ["pytest>=8,<10", "hypothesis>=6.100,<7"],
        "bench": ["matplotlib>=3.8,<4"],
    },
)
