"""Plan execution: the attempt lifecycle and its unit of work, the tracker, the lock,
the commit fence, signals and the loop watchdog."""
