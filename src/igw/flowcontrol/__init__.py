"""Stage 3: admit, queue or shed (priority bands and fairness come with flow control)."""
