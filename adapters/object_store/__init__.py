"""What the S3 and the local storage share: references, output sidecars, record rules."""
