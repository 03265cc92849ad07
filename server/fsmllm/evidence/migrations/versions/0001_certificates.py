"""The certificates table.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None


def upgrade() -> None:
    op.create_table(
        "certificates",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("completion_id", sa.String(128), nullable=True),
        sa.Column("issued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("model", sa.String(512), nullable=False),
        sa.Column("image_sha256", sa.String(64), nullable=False),
        sa.Column("document", sa.Text, nullable=False),
    )
    op.create_index("ix_certificates_completion_id", "certificates", ["completion_id"])
    op.create_index("ix_certificates_issued_at", "certificates", ["issued_at"])
    op.create_index("ix_certificates_image_sha256", "certificates", ["image_sha256"])


def downgrade() -> None:
    op.drop_table("certificates")
