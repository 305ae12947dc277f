"""Static sm_90 figures: every kernel launch the launchers make, compiled for an H100 without a GPU.

:mod:`.launches` records the launches (a dry run of the verify and benchmark cases at GPU shapes),
:mod:`.compile` compiles each for sm_90 and reads ptxas' registers, spills and shared memory,
:mod:`.occupancy` turns them into occupancy on a Hopper SM, and :mod:`.table` judges each launch against
its kernel's occupancy floor (``SM90_OCCUPANCY_FLOOR`` beside the kernel) and prints the table that
``fastdensity info --kernels`` shows. ``tests/test_sm90_compile.py`` runs it under CI's Triton and the
GPU machine's Triton 3.6.
"""
