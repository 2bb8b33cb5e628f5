"""The labeling web app (FastAPI, server-rendered Jinja2 pages, a small JSON API)."""
