from setuptools import find_packages, setup

setup(
    name="sparse_lm",
    version="0.1.0",
    description="Train weight-sparse GPT-2-style transformers on Python code and measure their circuits",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["sparse_lm", "sparse_lm.*", "kernels", "kernels.*"]),
    python_requires=">=3.10",
    install_requires=[
        # The GPU machines carry torch 2.11 and triton 3.6; CPU machines use torch 2.13 (CPU build).
        "torch>=2.11,<2.14",
        "triton>=3.6; platform_system == 'Linux'",
        "numpy>=1.24",
        "tokenizers>=0.20",
        "datasets>=2.19",
        "hydra-core>=1.3.2,<1.4",
        "tensorboard>=2.14",
        "matplotlib>=3.7",
    ],
    extras_require={
        # Hydra launchers for `python -m sparse_lm.frontier launcher=submitit_local|submitit_slurm` (parallel, cluster)
        "cluster": ["hydra-submitit-launcher>=1.2"],
        # the released models' tokenizer (tinypython_2k), read by tiktoken: sparse_lm.convert, converted checkpoints
        # and hf:<owner>/<repo> models, through huggingface_hub
        "reference": ["tiktoken>=0.7", "huggingface_hub>=0.34"],
        "test": ["pytest>=7", "hydra-submitit-launcher>=1.2", "tiktoken>=0.7", "huggingface_hub>=0.34"],
    },
)
