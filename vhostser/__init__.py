"""vhostser: a virtio-serial (virtio-console multiport) device back end served over vhost-user."""

__version__ = "0.1.0"
