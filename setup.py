from setuptools import setup

setup(
    name="lowrank",
    version="0.1.0",
    description="Exact and fast parameter-efficient fine-tuning (LoRA, soft prompts) of GPT-2 and T5, with Triton kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # kernels and models live inside lowrank/: `kernels` and `models` are other distributions' import names
    # (transformers imports the `kernels` distribution), so no top-level folder of the checkout may carry them.
    packages=["lowrank", "lowrank.kernels", "lowrank.models"],
    install_requires=[
        "numpy>=1.24",
        "torch>=2.13",
        "safetensors>=0.4",
        "triton>=3.8; platform_system == 'Linux'",  # 3.8 and 3.9 tested (.ci/run)
        "tqdm>=4.60",
    ],
    extras_require={
        "test": ["pytest>=8", "hypothesis>=6.100", "scikit-learn>=1.2", "matplotlib>=3.7"],
        # Floors tested by .ci/run (.ci/oldest-supported.txt); README's test command takes the newest.
        "interop": ["transformers>=5.15.1", "peft>=0.21.0", "tokenizers>=0.22.2"],
        "bench": ["matplotlib>=3.7"],
        "examples": ["scikit-learn>=1.2", "matplotlib>=3.7", "tokenizers>=0.22.2"],
    },
    entry_points={"console_scripts": ["lowrank=lowrank.cli:main"]},
)
