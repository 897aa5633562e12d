from setuptools import find_packages, setup

setup(
    name="moe-train",
    version="0.1.0",
    description="Train Mixture-of-Experts language models with expert, tensor and data parallelism",
    packages=find_packages(include=["moe_train", "moe_train.*"]),
    package_data={"moe_train": ["configs/*.yaml"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "numpy",
        "pyyaml",
        "tqdm",
        "tensorboard",
        "matplotlib",
        "psutil",
        "safetensors",
        "tokenizers",
        "pyarrow",
        "megatron-core",
        "deepspeed",
        "ray[default,train]",
    ],
    extras_require={
        "dev": ["pytest", "pytest-timeout", "transformers"],
    },
    entry_points={"console_scripts": ["moe-train=moe_train.cli:main"]},
)
