"""Ray Tune searches: noise schedules and loss weightings (schedules.py, each trial a Ray Train run,
stopped early by ASHA) and classifier-free guidance weights, samplers and NFE on a trained checkpoint
(guidance.py), with the search spaces (spaces.py), the metrics trials are ranked by (metrics.py) and
the reports (report.py). Ray is imported only by schedules.py and guidance.py."""
