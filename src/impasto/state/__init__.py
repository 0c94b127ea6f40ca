"""Where tasks, results and image records live (StateStore) and how changes are announced
(EventBus): SQLite and in-process by default, Redis when distributed."""
