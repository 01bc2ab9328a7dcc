"""The SQL catalog: schema (models), engine set-up and migrations (database)."""
