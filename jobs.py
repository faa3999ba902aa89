"""Entry point for arq: `arq jobs.WorkerSettings` runs thumbnails, EXIF and captions.

The job functions and the worker's settings live in imgapi_core.worker; this module names them
where arq (and the compose file) look for them.
"""

from imgapi_core.worker import WorkerSettings, caption_job, exif_job, thumbnail_job

__all__ = ["WorkerSettings", "caption_job", "exif_job", "thumbnail_job"]
