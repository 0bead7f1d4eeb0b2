package materializer

// Test hooks for the external test package (and this one).

// pauseHydration holds the store's hydrator until resumeHydration.
func pauseHydration(s *Store) {
	s.lazy.mu.Lock()
	s.lazy.paused = true
	s.lazy.mu.Unlock()
}

func resumeHydration(s *Store) {
	s.lazy.mu.Lock()
	s.lazy.paused = false
	s.lazy.mu.Unlock()
	s.wakeHydrator()
}

// disableRefs makes the store's later lazy imports write no references
// (to show that CollectFiles needs them).
func disableRefs(s *Store) {
	s.lazy.mu.Lock()
	s.lazy.noRefs = true
	s.lazy.mu.Unlock()
}

var (
	PauseHydration  = pauseHydration
	ResumeHydration = resumeHydration
	DisableRefs     = disableRefs
)
