package node

import "net/http"

func (a *Agent) serveExec(w http.ResponseWriter, r *http.Request) {
	http.Error(w, "exec is not implemented yet", http.StatusNotImplemented)
}

func (a *Agent) serveAttach(w http.ResponseWriter, r *http.Request) {
	http.Error(w, "attach is not implemented yet", http.StatusNotImplemented)
}
