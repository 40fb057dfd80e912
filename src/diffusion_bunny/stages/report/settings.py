"""Stage 09's settings (``report``): the figures of the QA report.

Read by the configuration (:mod:`diffusion_bunny.config`) on every command, so it imports
nothing heavier than pydantic.
"""

from __future__ import annotations

from pydantic import Field

from diffusion_bunny.section import Section


class ReportSettings(Section):
    """Settings of stage 09 (``report``): the figures of the QA report and its contact sheets."""

    dpi: int = Field(100, ge=30, le=600)
    contact_sheet_faces: int = Field(24, ge=1, le=1000)
    dataset_sheet_pictures: int = Field(8, ge=1, le=1000)
    max_characters: int = Field(12, ge=1, le=1000)
