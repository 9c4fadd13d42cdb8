pytest_plugins = ["tests.fixtures", "tests.bucket.s3server"]
