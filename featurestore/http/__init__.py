"""The HTTP service: :func:`featurestore.http.app.create_app` and the route modules under ``routes/``."""
