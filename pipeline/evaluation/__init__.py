"""Evaluation: FID (fid.py, features.py), bits/dim and variational bounds at scale (bpd.py).

Submodules are imported on use, so `import pipeline.evaluation` pulls in neither Ray nor tqdm.
"""
