package agent

import (
	"fmt"
	"os/user"
	"strconv"
	"strings"
)

// identity is who the workload runs as.
type identity struct {
	UID, GID uint32
	Groups   []uint32
	Home     string
}

// resolveUser resolves a docker-style user spec (name, uid, name:group,
// uid:gid and mixes) against the image's /etc/passwd and /etc/group; it must
// run after the agent has switched into the image's root. As in docker, a
// numeric uid need not exist in /etc/passwd (its group is then 0 and its home
// "/"), but a name must.
func resolveUser(spec string) (identity, error) {
	id := identity{Home: "/"}
	if spec == "" {
		spec = "0"
	}
	userPart, groupPart, hasGroup := strings.Cut(spec, ":")
	var u *user.User
	if n, err := strconv.ParseUint(userPart, 10, 32); err == nil {
		id.UID = uint32(n)
		if u, _ = user.LookupId(userPart); u == nil && id.UID == 0 {
			id.Home = "/root"
		}
	} else {
		u, err = user.Lookup(userPart)
		if err != nil {
			return id, fmt.Errorf("unable to find user %s: no matching entries in passwd file", userPart)
		}
	}
	if u != nil {
		uid, _ := strconv.ParseUint(u.Uid, 10, 32)
		gid, _ := strconv.ParseUint(u.Gid, 10, 32)
		id.UID, id.GID = uint32(uid), uint32(gid)
		if u.HomeDir != "" {
			id.Home = u.HomeDir
		}
	}
	if hasGroup {
		if n, err := strconv.ParseUint(groupPart, 10, 32); err == nil {
			id.GID = uint32(n)
		} else {
			g, err := user.LookupGroup(groupPart)
			if err != nil {
				return id, fmt.Errorf("unable to find group %s: no matching entries in group file", groupPart)
			}
			n, _ := strconv.ParseUint(g.Gid, 10, 32)
			id.GID = uint32(n)
		}
		return id, nil
	}
	if u != nil {
		// Supplementary groups, as docker adds them when no group is given.
		gids, _ := u.GroupIds()
		for _, g := range gids {
			if n, err := strconv.ParseUint(g, 10, 32); err == nil && uint32(n) != id.GID {
				id.Groups = append(id.Groups, uint32(n))
			}
		}
	}
	return id, nil
}
