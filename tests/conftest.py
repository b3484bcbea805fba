"""Shared pytest fixtures. Each area keeps its fixtures in its own module and re-exports them here."""

from tests.s3_fixture import s3_server, s3_server_running  # noqa: F401
from tests.copier_gate import copier_gate  # noqa: F401
from tests.deepspeed_3d_producer import ds3d_produced  # noqa: F401
from tests.deepspeed_mpu_producer import dsmpu_produced  # noqa: F401
