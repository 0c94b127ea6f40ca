"""Where image bytes live (ImageStore): a directory by default, an S3 bucket when distributed."""
