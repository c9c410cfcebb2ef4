"""The stream process: Binance WebSocket connections -> Redis lists."""
