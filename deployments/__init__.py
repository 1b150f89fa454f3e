"""Ray Serve plumbing: thin deployments around prism_ray's engines, the HTTP router, the app builder."""
