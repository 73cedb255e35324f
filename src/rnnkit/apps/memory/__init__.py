"""Long-memory experiments: the adding problem and the copy task, trained cell by cell."""
