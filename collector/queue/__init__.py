"""Redis: the key layout, the Lua scripts of reliable delivery, and shared counters."""
