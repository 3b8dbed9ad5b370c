# lbappliance VM image: Debian 12 + Debian's haproxy and keepalived + the lbappliance wheel in
# its own venv + the hardened units, sysctls and a cloud-init first-boot path.
#
# Works with the Debian-packaged Packer 1.6.6 (qemu builder built in) and with current Packer
# (there, run `packer init` after adding a required_plugins block for github.com/hashicorp/qemu;
# 1.6.6 does not know the `packer {}` block, so it is left out here).
#
# Normally driven by scripts/image/build-image.sh, which builds the wheelhouse, the throwaway
# SSH key and the build-time cloud-init seed, then runs `packer validate` and `packer build`.

variable "base_image" {
  type        = string
  description = "Path or URL of a Debian 12 cloud qcow2 (scripts/image/build-base.sh builds one locally)."
}

variable "base_image_checksum" {
  type        = string
  default     = "none"
  description = "Checksum of base_image: \"sha256:<hex>\", \"file:<path or URL of a sha256sum file>\" or \"none\"."
}

variable "wheelhouse" {
  type        = string
  description = "Directory holding the lbappliance wheel and all its dependency wheels (pip wheel . -w DIR)."
}

variable "ssh_private_key_file" {
  type        = string
  description = "Private half of the build-time key that build_seed_dir's user-data authorizes for root."
}

variable "build_seed_dir" {
  type        = string
  description = "Directory with the build-time cloud-init NoCloud files user-data and meta-data."
}

variable "repo_dir" {
  type        = string
  default     = "."
  description = "The lbappliance checkout (systemd/ and packer/ are uploaded from it)."
}

variable "output_directory" {
  type    = string
  default = "output-lbappliance"
}

variable "image_name" {
  type    = string
  default = "lbappliance.qcow2"
}

variable "disk_size" {
  type    = string
  default = "4096M"
}

variable "accelerator" {
  type        = string
  default     = "kvm"
  description = "kvm when /dev/kvm works, tcg (software emulation) otherwise."
}

variable "cpus" {
  type    = number
  default = 2
}

variable "memory" {
  type    = number
  default = 1536
}

variable "serial_log" {
  type        = string
  default     = "packer-serial.log"
  description = "The build VM's serial console (boot and cloud-init progress) goes here."
}

variable "debian_mirror" {
  type    = string
  default = "http://deb.debian.org/debian"
}

variable "ssh_timeout" {
  type    = string
  default = "30m"
}

source "qemu" "lbappliance" {
  iso_url          = var.base_image
  iso_checksum     = var.base_image_checksum
  disk_image       = true
  use_backing_file = false
  disk_size        = var.disk_size
  format           = "qcow2"
  disk_compression = true
  disk_interface   = "virtio"
  net_device       = "virtio-net"
  accelerator      = var.accelerator
  cpus             = var.cpus
  memory           = var.memory
  headless         = true
  output_directory = var.output_directory
  vm_name          = var.image_name
  qemuargs         = [["-serial", "file:${var.serial_log}"]]

  # Build-time access the same way users configure the image: a NoCloud seed (label cidata).
  cd_files = ["${var.build_seed_dir}/user-data", "${var.build_seed_dir}/meta-data"]
  cd_label = "cidata"

  communicator         = "ssh"
  ssh_username         = "root"
  ssh_private_key_file = var.ssh_private_key_file
  ssh_timeout          = var.ssh_timeout
  # The build key is removed last, from the shutdown command itself.
  shutdown_command = "rm -f /root/.ssh/authorized_keys && systemctl poweroff"
  shutdown_timeout = "10m"
}

build {
  sources = ["source.qemu.lbappliance"]

  provisioner "shell" {
    inline = [
      "cloud-init status --wait >/dev/null || cloud-init status --long || true",
      "mkdir -p /tmp/lbappliance/wheels /tmp/lbappliance/systemd /tmp/lbappliance/cloud-init",
    ]
  }

  provisioner "file" {
    source      = "${var.wheelhouse}/"
    destination = "/tmp/lbappliance/wheels/"
  }

  provisioner "file" {
    source      = "${var.repo_dir}/systemd/"
    destination = "/tmp/lbappliance/systemd/"
  }

  provisioner "file" {
    source      = "${var.repo_dir}/packer/cloud-init/"
    destination = "/tmp/lbappliance/cloud-init/"
  }

  provisioner "shell" {
    environment_vars = ["DEBIAN_MIRROR=${var.debian_mirror}", "DEBIAN_FRONTEND=noninteractive"]
    scripts = [
      "${var.repo_dir}/packer/scripts/10-packages.sh",
      "${var.repo_dir}/packer/scripts/20-lbappliance.sh",
      "${var.repo_dir}/packer/scripts/30-verify.sh",
      "${var.repo_dir}/packer/scripts/90-cleanup.sh",
    ]
  }
}
