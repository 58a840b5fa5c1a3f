"""Config classes (fields = config.json keys), their validation, AutoConfig and the named configs."""
