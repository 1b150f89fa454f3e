"""Ray Data batch entrypoints; the logic lives in `prism_ray.batch`."""
