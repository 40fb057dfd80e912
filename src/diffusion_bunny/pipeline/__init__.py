"""The machinery that knows no stage: the run folder, atomic writes, fingerprints and manifests,
the stage contract and run_stage, progress files, the papermill runner, the batch engines and
``bunny status``.
"""
