from setuptools import find_packages, setup

setup(
    name="hf_slimmoe",
    version="0.1.0",
    description="SlimMoE: compress Mixture-of-Experts LMs by expert slimming and multi-stage distillation, on the "
    "Hugging Face stack",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["hf_slimmoe", "hf_slimmoe.*"]),
    package_data={"hf_slimmoe": ["templates/*.md", "templates/*.jinja", "recipes/*.yaml", "recipes/*.json"]},
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "transformers>=5.0,<6",
        "accelerate>=1.0",
        "datasets>=3.0",
        "trl>=1.0",
        "peft>=0.17",
        "huggingface-hub>=1.0",
        "safetensors>=0.4",
        "evaluate>=0.4",
        "tokenizers>=0.20",
        "pyyaml>=6.0",
        "tqdm",
        "matplotlib>=3.7",
        "jinja2>=3.1",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout", "lm-eval>=0.4"],  # lm-eval: tests/test_eval.py runs the harness
        "eval": ["lm-eval>=0.4"],
    },
    entry_points={"console_scripts": ["slimmoe=hf_slimmoe.cli:main"]},
)
