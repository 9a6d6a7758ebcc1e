"""A reference transformer that declares its shape (the analytic forecast recognises it)."""
