"""PostgreSQL / TimescaleDB: schema, connections, COPY through staging, Timescale SQL."""
