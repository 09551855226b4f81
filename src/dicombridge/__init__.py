"""dicombridge: a DICOM bridge between hospitals through an end-to-end encrypted RabbitMQ tenant."""

__version__ = "0.1.0"
