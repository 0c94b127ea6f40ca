"""Task handlers behind the transports: validation against model rules, persistence, reference
images, seeds, cost, and delivery of finished items."""
