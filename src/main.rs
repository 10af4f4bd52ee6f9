fn main() {
    println!("skydd: the all-in-one launcher comes with the cloud issue");
}
